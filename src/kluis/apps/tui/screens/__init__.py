"""The app's screens: first run and unlock, the main chat screen, and its dialogs."""
