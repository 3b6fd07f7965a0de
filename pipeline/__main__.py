from pipeline.commands.cli import main

main()
