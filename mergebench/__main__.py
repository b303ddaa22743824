from mergebench.cli.main import main

main()
