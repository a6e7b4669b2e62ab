"""The `pdm` sub-commands, one module each (parser, argument checks, the work), and `base`, what they and the training
scripts share (flags, one-line errors, exit statuses). They are built on the library (the path checks and all-or-
nothing outputs of `progressive_denoising.files`, the work itself), which never imports them. Only the standard
library is imported at module level, so that help and argument errors come without torch."""
