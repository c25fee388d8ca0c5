from wanalpha.cli import main

if __name__ == "__main__":  # not when a spawned child process imports it (wanalpha.outputs.ProcessClipWriter)
    main()
