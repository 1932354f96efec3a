"""The faces a person uses: the classifier dashboards, the cleaning app, the Voila launcher, apps/."""
