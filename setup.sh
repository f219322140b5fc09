#!/bin/sh
# The manual's setup script: asks for the device, names and buffer size, then creates the bdr target.
# Non-interactive use: ./setup.sh --device /dev/sdb1 --name bdr_mapper --chardev bdr_char --buffer 64M
exec bdr setup "$@"
