# Registers the OMDb adapter with the ambassador: installing this distribution is all it takes.
from ambassador_omdb.adapter import OMDbPlugin

omdb = OMDbPlugin()
