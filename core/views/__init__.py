"""Read models behind the pages: review queues and filters (and the bulk actions built on them), the dashboard and its
plotly figures, the overview, data health and similar images."""
