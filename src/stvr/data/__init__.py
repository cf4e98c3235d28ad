"""Data: annotations (AVA, UCF-101-24, synthetic), pair files, video decoding, datasets."""
