"""The watch: signs of reward hacking and judge drift, for the /watch page, the metrics and the alerts.

`looks` makes thumbnails and edit distances off the event loop, `ring` keeps recent items in memory,
`windows` tallies scores against a baseline, `watch` ties them to each scored request, and `canary`
scores a calibration set to catch a judge that answers differently than it did.
"""
