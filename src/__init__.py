"""gpusnap: hibernate and wake vast.ai GPU machines by streaming their workspace to S3/R2 and back."""
