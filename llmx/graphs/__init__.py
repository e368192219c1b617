"""Graph tasks: shortest-path data (llmx.graphs.paths) and the line-graph spectral analysis (llmx.graphs.spectral)."""
