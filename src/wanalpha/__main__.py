from wanalpha.cli import main

main()
