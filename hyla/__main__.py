from hyla.cli import app

app()
