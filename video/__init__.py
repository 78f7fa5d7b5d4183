"""Video input for x2vlm, independent of the model: decoding, 1-fps timestamp sampling, frame transforms and
video shard writing. The image and region pipeline lives in x2vlm/data; this package holds nothing yet."""
