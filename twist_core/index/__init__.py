"""The FAISS image index on disk (generations, metadata), search and duplicates."""
