from zimage_server.cli import app

if __name__ == "__main__":  # not when a spawned worker imports this as __mp_main__
    app()
