"""Training loop and the naive / IPv1 / IPv2 experiment grid."""
