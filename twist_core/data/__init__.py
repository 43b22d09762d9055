"""Find and decode the images of a folder, the preprocessing contract, batch augmentation."""
