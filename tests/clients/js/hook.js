'use strict'
// One hooks call through bigbluebutton-js (npm), as an application makes it: the library
// builds and signs the URL, fetches it and parses the XML; this prints what it parsed, as
// one JSON object.  The gateway's URL and the customer's secret come from the environment:
//
//   BBB_URL=http://127.0.0.1:8080/acme/bigbluebutton BBB_SECRET=... node hook.js create <callbackURL> <meetingID> [eventIDs]
//   ... node hook.js list [meetingID]
//   ... node hook.js destroy <hookID>
//
// Run by tests/test_js_client.py.

const bbb = require('bigbluebutton-js')

function env(name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set`)
  return value
}

function url(hooks, command, args) {
  switch (command) {
    case 'create': {
      const [callbackURL, meetingID, eventID] = args
      const params = {}
      if (meetingID) params.meetingID = meetingID
      if (eventID) params.eventID = eventID
      return hooks.create(callbackURL, params)
    }
    case 'list':
      return hooks.list(args[0] ? { meetingID: args[0] } : {})
    case 'destroy':
      return hooks.destroy(args[0])
    default:
      throw new Error(`unknown command ${command}`)
  }
}

async function main() {
  const [command, ...args] = process.argv.slice(2)
  const api = bbb.api(env('BBB_URL'), env('BBB_SECRET'))
  const answer = await bbb.http(url(api.hooks, command, args))
  process.stdout.write(JSON.stringify(answer))
}

main().catch((error) => {
  process.stderr.write(`${(error && error.stack) || error}\n`)
  process.exit(1)
})
