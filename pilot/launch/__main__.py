from pilot.launch import main

raise SystemExit(main())
