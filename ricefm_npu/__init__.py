"""torch backend of riceFM for Ascend NPUs (torch-npu), CUDA and CPU; built on the shared core in ``ricefm``."""
