"""One evaluation suite for both backends: zero-shot clustering (scib), baselines, reports."""
