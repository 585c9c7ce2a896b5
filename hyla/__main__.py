from hyla.cli import main

main()
