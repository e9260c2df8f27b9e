from ranprm.bench import main

main()
