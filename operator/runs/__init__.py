"""Runs after they end: verdicts from finished Jobs and pods, recording into history, the reaper."""
