#!/bin/sh
# Write rabbitmq.conf from the environment, then run the command as the rabbitmq user.
set -eu
if [ "${1:-}" = rabbitmq-server ]; then
  shift
  {
    echo "loopback_users = none"  # guest may log in over the network, as in the official image
    echo "log.console = true"
    echo "log.console.level = info"
    echo "log.file = false"
    echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
    echo "default_vhost = ${RABBITMQ_DEFAULT_VHOST:-/}"
    echo "default_permissions.configure = .*"
    echo "default_permissions.read = .*"
    echo "default_permissions.write = .*"
  } >/etc/rabbitmq/rabbitmq.conf
  chmod 0640 /etc/rabbitmq/rabbitmq.conf
  chgrp rabbitmq /etc/rabbitmq/rabbitmq.conf
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  # The Debian wrapper would log to a file: run the real script, in the foreground, where it
  # turns SIGTERM into a clean stop.
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
    /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
