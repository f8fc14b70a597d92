"""Where each judge's prompt text comes from: the FIRM release (fetched and verified at run time),
this project's own templates, or the user's."""
