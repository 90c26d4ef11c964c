from cla2.cli import main

main()
