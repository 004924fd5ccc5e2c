from sightstream.cli import main

raise SystemExit(main())
