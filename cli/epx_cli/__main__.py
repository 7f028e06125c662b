from epx_cli.main import main

main()
