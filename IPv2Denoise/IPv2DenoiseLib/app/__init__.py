"""Front ends: the command line and its commands, the background job, the Slicer bridge and installer, figures."""
