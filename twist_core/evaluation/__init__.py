"""Score clusters against class folders (ACC/NMI/AMI/ARI, kNN)."""
