from zimage_server.cli import app

if __name__ == "__main__":  # not when a spawned worker re-imports a main script
    app()
