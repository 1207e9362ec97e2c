"""ml-collections configs; installed as the ``ricefm_configs`` package."""
