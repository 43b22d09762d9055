"""The app's ``twist`` commands, registered in pyproject.toml under the ``twist.commands`` entry-point group.

Loading this module is cheap (no Gradio): ``twist --help`` reads it to list the commands.
"""

from twist_core.cli import Command

APP = Command("app.main", "open the web app: browse, search, curate and export the clusters")
IMPORT_LABELS = Command("app.labelstudio", "apply the labels chosen in Label Studio (its JSON export) to the app")
