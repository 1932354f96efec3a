"""The lowest layer: errors, progress, images, the backbone registry, settings machinery, project paths,
artifacts and metrics. Core imports no task, stage or UI module."""
