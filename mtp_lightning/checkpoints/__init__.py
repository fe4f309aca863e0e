"""Checkpoint I/O shared by training, decoding and the experiment tools: atomic single-file
checkpoints, reading sharded (FSDP2) checkpoint folders in one process, the RNG states saved with
them, and loading a checkpoint for inference. Nothing here imports the training package."""
