// Command promql-names reads a JSON array of PromQL expressions on stdin and prints, as a JSON
// array in the same order, the metric names each one selects, as Prometheus's own parser reads
// them. A tokenizer would have to re-learn PromQL (function names, grouping labels, strings,
// durations, subqueries); the parser already knows it, and rejects an expression Prometheus
// would reject.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	Expr  string   `json:"expr"`
	Names []string `json:"names"`
	Error string   `json:"error,omitempty"`
}

func main() {
	var exprs []string
	if err := json.NewDecoder(os.Stdin).Decode(&exprs); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names: stdin must be a JSON array of strings:", err)
		os.Exit(2)
	}
	p := parser.NewParser(parser.Options{})
	results := make([]result, 0, len(exprs))
	for _, expr := range exprs {
		results = append(results, names(p, expr))
	}
	out := json.NewEncoder(os.Stdout)
	out.SetIndent("", "  ")
	if err := out.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names:", err)
		os.Exit(1)
	}
}

func names(p parser.Parser, expr string) result {
	r := result{Expr: expr, Names: []string{}}
	node, err := p.ParseExpr(expr)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	seen := map[string]bool{}
	parser.Inspect(node, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		if name == "" {
			for _, m := range vs.LabelMatchers {
				if m.Name == model.MetricNameLabel && m.Type == labels.MatchEqual {
					name = m.Value
				}
			}
		}
		if name == "" {
			// A name matched by a regex cannot be checked against what is served.
			r.Error = fmt.Sprintf("selector %s has no literal metric name", vs.String())
			return nil
		}
		seen[name] = true
		return nil
	})
	for name := range seen {
		r.Names = append(r.Names, name)
	}
	sort.Strings(r.Names)
	return r
}
