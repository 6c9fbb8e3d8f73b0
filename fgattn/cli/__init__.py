"""Command-line entry points: fgattn-train, fgattn-eval, fgattn-visualize."""
