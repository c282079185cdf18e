"""Settings: the registry of every setting (name, switch, type, default,
help), qpopper's config-file syntax, the frozen `Options` built from them,
and the man pages generated from the registry."""
