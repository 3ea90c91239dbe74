"""The `minicpm_flashinfer` attention backend: sparse-layer side and lightning side."""
