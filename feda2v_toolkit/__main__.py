from feda2v_toolkit.cli import main

if __name__ == "__main__":
    main()
