// Command kube-local is a busybox of unmodified upstream Kubernetes components for Nocturne's
// end-to-end tests: each component still runs in its own process with upstream flags.
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	_ "time/tzdata" // CronJob timeZone must not depend on the host's zoneinfo.

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
	"k8s.io/kubernetes/pkg/controller/job"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kube-local etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|version [flags]")
		os.Exit(2)
	}
	name := os.Args[1]
	// Each upstream command parses os.Args itself; make argv look like the real binary's.
	os.Args = append([]string{name}, os.Args[2:]...)
	switch name {
	case "etcd":
		etcdmain.Main(os.Args)
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		// The Job controller's 10 s pod-failure backoff is a package variable upstream's own
		// integration tests shorten; we allow the same, opt-in, so retry tests stay fast.
		if v := os.Getenv("KUBE_LOCAL_JOB_POD_FAILURE_BACKOFF"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil {
				fmt.Fprintf(os.Stderr, "KUBE_LOCAL_JOB_POD_FAILURE_BACKOFF %q: %v\n", v, err)
				os.Exit(2)
			}
			job.DefaultJobPodFailureBackOff = d
		}
		os.Exit(cli.Run(kcm.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kubelet":
		os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
	case "version":
		fmt.Println(version.Get().GitVersion)
	default:
		fmt.Fprintf(os.Stderr, "kube-local: unknown component %q\n", name)
		os.Exit(2)
	}
}
