"""The command line (``ricefm``) and the demo: the top layer, above the backends (DESIGN.md section 1)."""
