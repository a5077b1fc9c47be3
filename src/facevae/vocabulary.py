"""Names the command line shows before anything heavy is imported (this module imports nothing): the grammar of a
face argument and the modes of a latent path. facevae.faces and facevae.latent use them from here."""

FACE_HELP = "an image file (any size) or test:N / train:N (image N of that split of the run's data)"
MODES = ("slerp", "lerp")  # latent paths: along the sphere (norm between the ends'), or a straight line
