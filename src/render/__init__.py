"""Rendering of measured results: Markdown tables and logger rows (report.py), figures (figures.py), the HTML
depth map (html.py) and the per-token layer-count streamer (streamer.py). Everything here draws plain results
(dicts, records) and measures nothing; `src/eval/` measures."""
