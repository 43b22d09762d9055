"""The TWIST network (backbone, projection MLP, head), where its weights start, and its checkpoint file."""
