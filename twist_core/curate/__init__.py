"""The person's decisions about the clusters (the curation store the app writes), merge
suggestions for an over-clustered model, and fine-tuning a run on the corrections."""
