from zimage_server.cli import app

app()
