"""The Textual dashboard (`ffrtmp dash`); it reads the master only through `bus`."""
