"""The `pdm` sub-commands, one module each (parser, argument checks, the work), and what they share: `base` (flags,
one-line errors, exit statuses) and `files` (path checks, outputs written all or nothing). Only the standard library
is imported at module level, so that help and argument errors come without torch."""
