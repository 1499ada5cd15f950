import sys

if "--toy" in sys.argv[1:]:
    from .toy import main as toy_main

    sys.exit(toy_main([a for a in sys.argv[1:] if a != "--toy"]))

from .run import main

sys.exit(main())
