from pilot.launch.cli import main

main()
