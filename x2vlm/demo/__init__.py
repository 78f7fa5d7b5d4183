"""The built-in demo: ShapesWorld, a synthetic world of coloured shapes (images with boxes and phrases, clips that
move and change colour, with captions and typed questions), and `x2vlm demo`, which writes it to shards in the
published formats, pre-trains and fine-tunes the tiny preset on it and evaluates the result."""
